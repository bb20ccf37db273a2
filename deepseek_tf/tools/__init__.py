"""Utilities a user reaches for, installed with the package (see README, "Tools").

    python -m deepseek_tf.tools.merge_lora        (deepseek-tf-merge-lora)
    python -m deepseek_tf.tools.compare_runs      (deepseek-tf-compare-runs)
    python -m deepseek_tf.tools.inspect_checkpoint  (deepseek-tf-inspect-checkpoint)
    python -m deepseek_tf.tools.profile_summary   (deepseek-tf-profile-summary)

They import the package; nothing in the package imports them.
"""

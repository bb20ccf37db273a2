"""Training: optimizer, steps, checkpoints, logging and the loop (`python -m deepseek_tf.train`)."""

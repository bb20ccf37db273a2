"""deepseek_tf: pretrain, fine-tune, evaluate and deploy DeepSeek-style LLMs in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"

from .gpt import GPT, GPTOutput

__all__ = ["GPT", "GPTOutput"]

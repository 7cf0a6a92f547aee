"""moa-hub: compress the attention of Hugging Face causal LMs with MoA and publish the result."""

__version__ = "0.1.0"

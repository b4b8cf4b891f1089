"""batch-upscaler: resumable batch upscaling of image collections with Stability AI models on Amazon Bedrock."""

__version__ = "0.1.0"

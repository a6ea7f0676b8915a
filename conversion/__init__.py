"""Conversion of original GOOM-SSM checkpoints and GPT-2 tokenizer files to Hugging Face format."""

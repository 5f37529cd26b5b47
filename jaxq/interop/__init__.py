"""Other people's formats: pure conversions of jaxq models to and from them (GGUF export; GPTQ and
compressed-tensors Hugging Face directories, both ways)."""

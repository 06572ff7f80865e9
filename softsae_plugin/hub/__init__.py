"""The Hugging Face Hub: `sae-lens push` and the model card it writes."""

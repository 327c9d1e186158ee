"""hf-drencoder as a Flower App: client-level DP LoRA fine-tuning of MiniLM on Reuters-R8."""

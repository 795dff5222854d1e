"""Using the trained model: sampling (generate.py), loading a checkpoint or an export for inference (loading.py), the
exports (export.py, hf_tokenizer.py), the Gradio Space (space_app.py, app.py) and lm-evaluation-harness (evaluate.py)."""

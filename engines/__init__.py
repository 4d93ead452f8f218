"""Model back ends: torch, transformers, diffusers, open_clip, peft. No gradio, no SQL."""

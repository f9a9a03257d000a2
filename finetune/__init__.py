"""Finetuning entry point (installed as `litattn.finetune`; run as `litattn finetune`)."""

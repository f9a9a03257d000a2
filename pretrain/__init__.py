"""Pretraining entry point (installed as `litattn.pretrain`; run as `litattn pretrain`)."""

"""Distillation: the teacher store (`store`), the KL/CE loss (`loss`), pairs and batching (`pairs`), and the
Trainer subclass that runs them (`trainer`)."""

"""Supervised fine-tuning on demonstrations (InstructGPT step 1): `args` the hyper-parameters, `train` the
loop and its registration."""

"""The method itself: configs and their checks, routers, experts, the MoA layer, injection into a base
model, the model wrapper, compilation and telemetry. Needs torch and transformers only (no Hydra), and
imports nothing from the rest of moa_train except ``errors`` and ``files``."""

"""Model card template of GOOM-SSM models (installed as ``goom_ssm.model_cards``)."""

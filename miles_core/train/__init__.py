"""Training side of miles: the trainer, the RL loss math, advantage estimators and corrections."""

"""CRAFT fine-tuning: counterfactual proxy, rewards (and later collectors, trainers)."""

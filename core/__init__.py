"""The vocabulary every other package shares, and that depends on none of them: the model's
shape (`config.MoEConfig`), the domain errors (`errors`) and the served dtypes (`dtypes`)."""

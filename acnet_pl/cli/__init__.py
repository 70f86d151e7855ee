"""The entry points: train, evaluate, deploy, analyze, the sweep table; `common`: what they share.
Kept free of imports: train.py and deploy.py check their command line before torch loads."""

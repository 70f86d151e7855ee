"""The deploy files: the fused model's record (deploy.pt), its report, the logit check and the exporters."""

"""nnunet-semisam: semi-supervised nnU-Net v2 plugin (unlabeled data, foundation-model teachers, Mamba students)."""
__version__ = "0.1.0"

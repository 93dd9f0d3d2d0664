"""nnU-Net v2 interop: pretrained weights in nnU-Net's and nnssl's formats, and nnU-Net as a fine-tuning engine."""

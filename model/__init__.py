"""The multimodal network, curriculum, losses, metrics, preprocessing, checkpoint format and the
``Tagger`` predictor. Pure PyTorch: no Ray, no Redis, no S3."""

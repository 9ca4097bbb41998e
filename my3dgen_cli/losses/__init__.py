"""What training and inversion measure: perceptual distance (LPIPS), ArcFace identity, metrics."""

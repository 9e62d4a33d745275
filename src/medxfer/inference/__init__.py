"""Using a trained run: predict on new images, explain with Grad-CAM, export."""

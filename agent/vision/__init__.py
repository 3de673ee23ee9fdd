"""Preprocessing (letterbox), output decoders, NMS, and the data types they share."""

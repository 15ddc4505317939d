"""Video decoding, the JSONL video-QA format, converters and the synthetic task."""

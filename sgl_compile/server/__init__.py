"""HTTP server: OpenAI-compatible and SGLang-native APIs over a scheduler process."""

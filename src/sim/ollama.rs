//! Simulated Ollama server (to be written).

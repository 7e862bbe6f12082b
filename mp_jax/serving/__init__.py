"""Layer 4, serving: compiled programs, the engine that schedules them, Predictor, workers."""

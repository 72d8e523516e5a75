"""A trained model at work: the predictor, face detection, tracking, video I/O, export
(ONNX / TFLite / SavedModel / StableHLO), the JAX-free runtime, the released
models and the browser demo. `runtime`, `detection` and `video` import no JAX/TF.
"""

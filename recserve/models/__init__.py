"""Reference recommenders: a DCN-v2 ranker and a two-tower retriever, their training and ONNX export."""

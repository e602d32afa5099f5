"""Inference below the scripts: what turns a checkpoint into a ready model and an image into a
prediction, written once for validate.py, validate_seg.py, validate_det.py, predict.py,
tools/visualize.py and the notebook. classifier, segmentor and detector resolve and build each kind
of model from any checkpoint form; tasks tells which kind a checkpoint holds; images reads users'
images as shown and names the files written for them; overlays draws predictions on images."""

"""Explanations of predictions: `textual` (descriptor scores of CBD, as terminal bars and figures);
visual explanations (saliency maps) join in round 2."""

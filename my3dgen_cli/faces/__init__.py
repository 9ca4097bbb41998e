"""Photos in: face detection, EG3D's crop and camera, and the dataset.json of a crop folder."""

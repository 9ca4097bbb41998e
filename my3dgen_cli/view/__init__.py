"""`my3dgen view`: an interactive viewer of a generator in the browser.

- `scene.py`: what is shown (one or two latents, their tri-planes cached) and how a frame is made;
- `saves.py`: the PNG and orbit MP4 the page's buttons write;
- `server.py`: the local web server (token and Origin guard, newest-request-wins frames, in-memory assets);
- `assets/`: the page itself (HTML, JS, CSS; no framework, nothing from a CDN).

Only `server.py` needs the optional web stack (`pip install "my3dgen[view]"`).
"""

"""The Gradio web app (``studio ui``); built on the public :mod:`studio` API only."""

"""`arrag app`: a local page that compares base, DAiD and FAiD and shows which database patches each step drew on.

session.py holds what the page computes (testable without a browser); page.py is the Gradio page (the optional
extra `arrag[app]`).
"""

"""The OpenAI-compatible HTTP server (``tokenmill serve``): FastAPI app, protocol models,
streaming, metrics. Entry point: :func:`tokenmill.api.server.run_server`; the app itself:
:func:`tokenmill.api.app.build_app`."""

"""The compiler: capture a model as a graph (``tracer``), run the passes in order (``transform``,
the driver) and keep what they decided (``plan``); ``model_file`` loads a user's model file."""

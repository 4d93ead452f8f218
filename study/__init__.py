"""The vote store and the science on it: SQLAlchemy and pandas, never torch or gradio."""

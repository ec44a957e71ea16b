"""What the evaluate stage measures (text metrics with bootstrap intervals) and writes (the report and its plots)."""

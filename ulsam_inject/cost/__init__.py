"""What a model costs: parameters, MACs, other ops and bytes, counted per fx node by rule."""

"""Architecture-independent pieces shared by every attention kernel: sequence bounds,
mask block ranges, the tile scheduler, named barriers, element types, DSL compatibility."""

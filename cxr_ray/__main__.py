from cxr_ray.cli import main

main()

"""The residual from the bases stored in an adapter file: exact for every static method, FLUX, SD3 and SDXL files."""

from qrlora.cli.residual import extract_main

if __name__ == "__main__":
    extract_main()

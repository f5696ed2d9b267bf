"""`build_cache`: the function form of `TeacherCache.build` (run the teacher, write the cache, open
it). The writing itself lives in fastdistill/cache/writer.py."""
from fastdistill.cache.dataset import TeacherCache

build_cache = TeacherCache.build

__all__ = ["build_cache"]

@echo off
echo Hello from a Windows container.
type C:\app\build-info.txt

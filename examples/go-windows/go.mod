module example.com/go-windows

go 1.22
